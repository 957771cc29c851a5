"""``busd serve``: the daemon (:mod:`busd.daemon.core`), its keeper of keep-alives
(:mod:`busd.daemon.keeper`), its export loop (:mod:`busd.daemon.publisher`) and its request
API on NATS (:mod:`busd.daemon.answers`)."""

from busd.daemon.core import Daemon as Daemon
from busd.daemon.core import Stats as Stats
from busd.daemon.core import serve as serve
