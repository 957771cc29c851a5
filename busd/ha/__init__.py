"""Hot standby: a lease decides which ``busd serve`` is active (:mod:`busd.ha.lease`); a
standby follows the stream into its own catalog (:mod:`busd.ha.follower`); the instance that
wins the lease backfills what the former active acked (:mod:`busd.ha.backfill`). A former
active that finds it lost the lease stops acking at once and exits; everything it wrote is
harmless because the fold is idempotent.
"""
