"""Status API and live page (FastAPI). A placeholder until its own issue: see README."""
