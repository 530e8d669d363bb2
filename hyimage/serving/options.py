"""The server's startup options that the CLI and `create_app` both check: the API key."""

from hyimage.errors import RequestError

API_KEY_ENV = "HYIMAGE_API_KEY"


def check_api_key(key: str | None) -> str | None:
    """None (no authentication) or a key a client can send; an empty or blank key is refused, never served."""
    if key is None:
        return None
    if not key.strip():
        raise RequestError(
            "--api-key",
            f"--api-key (or ${API_KEY_ENV}) is empty: an empty key would authenticate nobody or everybody. Pass a "
            f"key (e.g. --api-key \"$(openssl rand -hex 16)\"), or unset {API_KEY_ENV} to serve without one",
        )
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        raise RequestError(
            "--api-key",
            f"--api-key (or ${API_KEY_ENV}) must be printable ASCII without spaces at its ends (clients send it in "
            "the header `Authorization: Bearer KEY`)",
        )
    return key
