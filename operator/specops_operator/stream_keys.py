"""Fresh CURVE key pairs for one stream, as the text of ZeroMQ certificate files.

Not a builder: it draws random keys, so the handler calls it only when the stream's Secret does
not exist yet (a Secret is never re-keyed: running pods hold the keys they mounted). The keys
live only in memory and in the Secret: nothing here writes a file or logs.
"""

from __future__ import annotations

from specops_operator.builders.stream import SECRET_KEYS


def certificate(public: bytes, secret: bytes | None = None) -> str:
    """A certificate in the format `zmq.auth.load_certificate` reads (a `curve` section)."""
    lines = [
        "#   ZeroMQ CURVE certificate of a SpecOps stream, made by the operator",
        "",
        "metadata",
        "curve",
    ]
    lines.append(f'    public-key = "{public.decode("ascii")}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """`<name>.key` (public) and `<name>.key_secret` (both keys) for the broker and each role."""
    import zmq

    files: dict[str, str] = {}
    for name in sorted({key.partition(".")[0] for key in SECRET_KEYS}):
        public, secret = zmq.curve_keypair()
        files[f"{name}.key"] = certificate(public)
        files[f"{name}.key_secret"] = certificate(public, secret)
    return files
