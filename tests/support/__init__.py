"""Test helpers shared by every tier: archive builders and a fake worker fleet."""
