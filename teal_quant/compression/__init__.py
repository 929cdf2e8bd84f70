"""The compression side: a recipe and a base model in, one artifact out.

recipe (the schema) -> sources (the base model, layer by layer) + data (calibration text) -> calibrate (histograms,
thresholds, allocation) + quantize (RTN, GPTQ) -> pipeline (the layer-streaming loop that writes the artifact
through teal_quant.artifact). synthetic makes random-weight artifacts of real shapes for benchmarks.
"""
