"""Local stand-ins for CRMs, served over real HTTP, for the demo and the tests."""
