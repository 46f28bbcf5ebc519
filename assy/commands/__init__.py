"""CLI commands beyond the core ones in ``assy.cli``: one module per feature, each
exporting one click command that ``assy.cli`` registers. Heavy imports stay inside the
command functions so that ``assy --help`` stays fast."""
