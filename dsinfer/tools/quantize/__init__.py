"""The offline quantizer behind `dsinfer quantize`: calibration (calibrate.py), GPTQ (gptq.py), the per-unit
choice of bits (mixed.py), and writing a checkpoint in the hub's GPTQ layout (export.py). It runs on top of
the engine and is never imported by it."""
