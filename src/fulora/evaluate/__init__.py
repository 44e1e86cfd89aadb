"""Evaluation: metrics (with the paper's AUC), bootstrap intervals, calibration, reports."""
