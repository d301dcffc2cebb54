"""speechllm: teach a text LLM to hear without making it forget (DeSTA2 self-output recipe)."""

__version__ = "0.1.0"
