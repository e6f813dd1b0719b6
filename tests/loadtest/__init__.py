"""Tests of loadtest/: seeding, the HTTP load client, the bench report, the locust gate."""
