"""Simulated trainers built on the SDK: the decisions (`behavior`), one agent's
loop (`trainer`), many of them at once (`swarm`), and the C they share
(`codegen`, templates in `codegen_templates/`). Not needed to write an agent."""
