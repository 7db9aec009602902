"""The OpenAI-compatible HTTP server: `create_app(lm)`, run by `gemmakit serve`.

Imported lazily so that `gemmakit` works without the 'serve' extra (FastAPI, uvicorn).
"""


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["create_app"]
