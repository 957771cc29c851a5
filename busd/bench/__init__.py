"""``busd bench``: environment (:mod:`.env`), measurements (:mod:`.measure`, :mod:`.live`,
:mod:`.soak`) and the run and its report (:mod:`.report`); the command is in the CLI."""
