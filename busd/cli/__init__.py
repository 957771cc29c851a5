"""The ``busd`` command line: :mod:`.main` (the app and the core commands), :mod:`.admin`,
:mod:`.migration`, :mod:`.bench`; what they share is :mod:`.options`."""
