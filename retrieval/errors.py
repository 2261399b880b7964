"""One base exception for everything a user can get wrong; the CLI turns these into one line."""


class ClipdexError(Exception):
    """Base class: the message is meant for the user and says what to do."""


class ModelError(ClipdexError):
    """The model name, config file or weights cannot be used."""


class IndexNotFoundError(ClipdexError):
    """The index directory is missing or holds no clipdex index."""


class IndexFormatError(ClipdexError):
    """The index directory exists but is damaged, truncated or of a newer format."""


class IndexLockedError(ClipdexError):
    """Another process is writing to the index."""


class InputError(ClipdexError):
    """A path, caption file, column or option given by the user is unusable."""


class DatasetError(ClipdexError):
    """An evaluation dataset root is missing, incomplete or of an unknown layout."""


class ItemNotFoundError(InputError):
    """No item has the id asked for (in the server: a 404)."""
