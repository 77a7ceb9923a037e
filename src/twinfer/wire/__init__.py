"""The twinfer binary protocol, sans-I/O: no Twisted import, no socket.

Layered bottom-up, each module importing only those above it in this list:

- :mod:`twinfer.wire.messages` — the message classes and type/dtype codes;
- :mod:`twinfer.wire.frames` — the frame header, the layout constants and
  :class:`~twinfer.wire.frames.FrameDecoder` (reassembly from any chunking);
- :mod:`twinfer.wire.decode` / :mod:`twinfer.wire.encode` — one reader per
  message type, one writer per message class;
- :mod:`twinfer.wire.events` — what a connection hands to its adapter;
- :mod:`twinfer.wire.connection` — one side of a connection: the HELLO
  handshake, request ids, and which errors close the connection.  The
  Twisted server, the Twisted client and the blocking client are adapters
  over it.
"""
