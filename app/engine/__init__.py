"""asyncio engine: live runs, the run manager, the flusher."""
