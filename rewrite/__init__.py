"""rewrite: torch.fx model surgery with declarative rules, and a params/FLOPs diff report."""

__version__ = "0.1.0"
