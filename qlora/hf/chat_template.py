"""`data.chat_template`: which Jinja chat template renders conversations, and where it is kept.

A recipe names a template the tokenizer ships (transformers keeps several as a dict of names in
`tokenizer.chat_template`; a single one is called `default` here), the one template qlora ships
(`chatml`, the `<|im_start|>role ... <|im_end|>` layout), or gives a path to a `.jinja` file. The
chosen template is set on the tokenizer before any row is rendered, and written as
`chat_template.jinja` with the tokenizer files into the adapter folder (transformers reads that
file when it loads a tokenizer; `qlora merge` copies it into the merged folder), so `qlora
generate`, `AutoTokenizer` and the merged model render prompts exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

from qlora.errors import UsageError

TEMPLATE_FILE = "chat_template.jinja"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SHIPPED = {"chatml": CHATML}


def is_template_file(value: str) -> bool:
    """A `data.chat_template` value is a file when it ends in .jinja or names a path with a folder."""
    return value.endswith(".jinja") or "/" in value or Path(value).expanduser().is_file()


def read_template_file(value: str) -> str:
    """The text of a .jinja template file, parsed once so a syntax error names its line."""
    import jinja2

    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"data.chat_template: {value!r} is not a file; give a .jinja file or a template name")
    try:
        source = path.read_text(encoding="utf-8")
        jinja2.Environment().parse(source)
    except UnicodeDecodeError:
        raise UsageError(f"data.chat_template: {value!r} is not UTF-8 text") from None
    except jinja2.TemplateSyntaxError as err:
        raise UsageError(f"data.chat_template: {value!r} line {err.lineno}: {err.message}") from None
    return source


def named_templates(tokenizer) -> dict[str, str]:
    """The templates a tokenizer knows by name, plus the ones shipped here."""
    own = getattr(tokenizer, "chat_template", None)
    names = dict(own) if isinstance(own, dict) else {"default": own} if own else {}
    return {**names, **{k: v for k, v in SHIPPED.items() if k not in names}}


def resolve_chat_template(value: str, tokenizer) -> str:
    """The template text a `data.chat_template` value stands for."""
    if is_template_file(value):
        return read_template_file(value)
    known = named_templates(tokenizer)
    if value not in known:
        raise UsageError(f"data.chat_template: {value!r} is not a template this tokenizer knows; allowed: "
                         f"{', '.join(sorted(known))}, or a path to a .jinja file")
    return known[value]


def set_chat_template(tokenizer, value: str | None):
    """Set the recipe's template on `tokenizer` (unchanged when `value` is None); returns it."""
    if value is not None:
        tokenizer.chat_template = resolve_chat_template(value, tokenizer)
    return tokenizer


def saved_chat_template(folder: str | Path) -> str | None:
    """The template saved in an adapter or model folder, if any."""
    path = Path(folder) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
