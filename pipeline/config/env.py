"""Environment overrides: a key whose :class:`Spec` names ``env`` takes that variable's value.

They let secrets (DSN, tokens, API keys) stay out of the TOML file. The walker reads them
once, at load time, so stages never see the environment (STYLE.md, rule 12). A set variable
wins over the file even when it is empty, and the file's value for that key is then not
checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.config.spec import Spec


def variable(spec: Spec, name: str) -> str | None:
    """The variable that overrides a key of the table called ``name``, or None.

    ``{name}`` in ``spec.env`` becomes the table's name in upper case with ``-`` as ``_``
    (``[responders.faq-bot]`` -> ``PIPELINE_RESPONDER_FAQ_BOT_API_KEY``).
    """
    if spec.env is None:
        return None
    return spec.env.format(name=name.upper().replace("-", "_"))


def overriding(env: Mapping[str, str], spec: Spec, name: str) -> str | None:
    """The variable of ``env`` that sets this key instead of the file, or None."""
    var = variable(spec, name)
    return var if var is not None and var in env else None
