# The protocol's two kinds of error (h11 style), rooted in one base class.
#
# LocalProtocolError: we were asked to do something the protocol forbids
# (a bug or a misuse on our side: a frame too large, a bad argument).
# RemoteProtocolError: the peer or the wire sent something bad.
# A decoder raises nothing but RemoteProtocolError, whatever it is fed.


class ProtocolError(Exception):
    # reason: a short stable token (for counters and metrics), never free text.
    def __init__(self, message: str, reason: str = "invalid", device_id: "str | None" = None,
                 seq: "int | None" = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.device_id = device_id
        self.seq = seq

    def __str__(self) -> str:
        return self.message


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class AuthenticationError(RemoteProtocolError):
    # The MAC did not verify, or the key id is unknown or revoked.
    pass
