# Runs before main.py on every boot. Nothing to do: Wi-Fi stays off (boards
# talk to the hub over USB or BLE only) and the REPL stays on the console.
