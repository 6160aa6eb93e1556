"""Config: YAML loading, dotted command-line overrides, strict checking.

(stub: being written; UserError and Cfg are final)
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing dataset, ...).

    The launcher prints its message as one line and exits with status 2.
    """


class Cfg(dict):
    """A dict with attribute access: ``cfg.optim.lr`` == ``cfg["optim"]["lr"]``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    @staticmethod
    def wrap(d):
        """Recursively turn nested dicts into Cfg."""
        if isinstance(d, dict):
            return Cfg({k: Cfg.wrap(v) for k, v in d.items()})
        return d
