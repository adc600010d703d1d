"""The F5C multitask network, its AU-coordination graph head, and its losses."""
