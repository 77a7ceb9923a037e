"""Just enough telnet for a line protocol: hide the password, drop the client's commands.

The console is plain lines both ways, so ``nc`` works as well as ``telnet``.
Two pieces of telnet (RFC 854, RFC 857) make ``telnet`` behave:

* around the password prompt the console sends :data:`HIDE_INPUT`
  (``IAC WILL ECHO``: the server will echo, so the client stops echoing
  what is typed; the server then echoes nothing) and afterwards
  :data:`SHOW_INPUT` (``IAC WONT ECHO``: the client echoes again);
* :class:`TelnetInput` removes the commands a client sends (its answers to
  those two, its own option requests, subnegotiations) from the bytes
  before they are split into lines, wherever TCP splits them, and notices
  an interrupt (Ctrl-C at ``telnet``: ``IAC IP``; Ctrl-Z: ``IAC SUSP``).

The console leaves a client's own option requests unanswered: every option
stays off, as on a connection where nothing was negotiated.
"""

from __future__ import annotations

from twisted.conch.telnet import DO, DONT, ECHO, IAC, IP, SB, SE, WILL, WONT

#: Suspend process (``IAC SUSP``, RFC 1184; not among twisted.conch's names).
SUSP = b"\xed"
#: Commands that end a console session.
INTERRUPTS = frozenset((IP, SUSP))
#: Before the password prompt: the server will echo, so the client does not.
HIDE_INPUT = IAC + WILL + ECHO
#: After the password: the client echoes what is typed again.
SHOW_INPUT = IAC + WONT + ECHO

_NEGOTIATION = frozenset((WILL, WONT, DO, DONT))

# Where the input stands: in data, after IAC, after IAC WILL/WONT/DO/DONT
# (the option byte is next), in a subnegotiation, after IAC within one.
_DATA, _COMMAND, _OPTION, _SUBNEGOTIATION, _SUBNEGOTIATION_IAC = range(5)


class TelnetInput:
    """Separates the data a telnet client sends from its commands.

    Sans I/O: :meth:`feed` takes the bytes as they arrive and returns the
    data in them; a command split over two calls is remembered (as a state,
    so a subnegotiation that never ends buffers nothing).
    """

    def __init__(self) -> None:
        self._state = _DATA
        #: Set once the client sent an interrupt (``IAC IP`` or ``IAC SUSP``).
        self.interrupted = False

    def feed(self, data: bytes) -> bytes:
        """The data bytes of ``data``, telnet commands removed (``IAC IAC`` is a
        literal 0xff).  On an interrupt, :attr:`interrupted` is set and what
        follows it is dropped."""
        if self.interrupted:
            return b""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _DATA:
                j = data.find(IAC, i)
                if j < 0:
                    out += data[i:]
                    break
                out += data[i:j]
                i = j + 1
                self._state = _COMMAND
                continue
            byte = data[i : i + 1]
            i += 1
            if state == _COMMAND:
                self._state = _DATA
                if byte == IAC:
                    out += IAC
                elif byte in _NEGOTIATION:
                    self._state = _OPTION
                elif byte == SB:
                    self._state = _SUBNEGOTIATION
                elif byte in INTERRUPTS:
                    self.interrupted = True
                    break
                # Any other command (NOP, AYT, GA, ...) means nothing here.
            elif state == _OPTION:
                self._state = _DATA
            elif state == _SUBNEGOTIATION:
                if byte == IAC:
                    self._state = _SUBNEGOTIATION_IAC
            else:  # after IAC in a subnegotiation: IAC SE ends it, IAC IAC is data
                self._state = _DATA if byte == SE else _SUBNEGOTIATION
        return bytes(out)
