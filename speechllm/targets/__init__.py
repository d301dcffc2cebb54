"""Training targets in the base LLM's own words (DeSTA2's self-output recipe) and the strategies
to compare it with."""
