"""Offline evaluation: metrics, JSONL samples, sweeps and gap recovery."""
