"""The library's user-error type: a `ValueError` that names the argument at fault."""


class InvalidArgument(ValueError):
    """An argument outside what it accepts. `name` is the argument's name (e.g. "top_p"),
    for callers that report it in their own terms (the server's OpenAI `param`)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
