"""Adapters as data: which modules get one (`surgery`), the settings that describe them (`spec`),
their PEFT-format folders (`peft_format`), and merging them into base weights (`merge`)."""
