# Freeze manifest for an ESP32 MicroPython build with the firmware inside:
#   make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/firmware_mpy/manifest.py
# Frozen modules run from flash and take no heap for their bytecode.
include("$(PORT_DIR)/boards/manifest.py")
package("protocols", base_path="$(MPY_DIR)/../pulsebridge")
package("app")
package("drivers")
module("board_esp32.py")
