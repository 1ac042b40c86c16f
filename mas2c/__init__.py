"""mas2c: build, run and repair LLM multi-agent systems (MAS²)."""

__version__ = "0.1.0"
