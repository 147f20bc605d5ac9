"""Agent side of DeepSeek-V3.2 (spec §4): chat and tool format, tool registry, rollouts, context management."""
