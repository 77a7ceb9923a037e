"""Front ends: each translates one wire format to data-plane calls and back.

:mod:`twinfer.frontends.binary` is the binary protocol's Twisted adapter over
:class:`twinfer.wire.connection.Connection`; :mod:`twinfer.frontends.http`
serves KServe v2 and the seed's image API with ``twisted.web``;
:mod:`twinfer.frontends.console` is the operators' debug console.  None of
them admits, validates, queues or counts a request itself: that is
:class:`twinfer.dataplane.DataPlane`'s job, the same for all of them.
"""
