"""gastown-sandboxd: keeps a sandbox's gateway token alive and gt's model config applied."""

__version__ = "0.1.0"

__all__ = ["__version__"]
