"""Loaded by a busd the tests start with this folder on PYTHONPATH: once its fetch loop has
had one batch, its next fetch never returns (busd's own loop stuck, which nothing outside
the process can stage); the prefetch already asked for fills the buffer meanwhile."""

import asyncio
from typing import Any

import busd.source.pull as pull

_fetch = pull.PullSource.fetch
_got = False


async def _stuck_after_one(self: pull.PullSource, *args: Any, **kwargs: Any) -> Any:
    global _got
    if _got and kwargs.get("until") is None:
        await asyncio.Event().wait()
    out = await _fetch(self, *args, **kwargs)
    _got = _got or bool(out and kwargs.get("until") is None)
    return out


pull.PullSource.fetch = _stuck_after_one  # type: ignore[method-assign]
