"""The one exception for a user's mistake; every module may raise it, cli.main reports it."""


class UserError(Exception):
    """A configuration mistake: reported as one line with exit status 2."""
