"""analysis, the top floor: intruder dimensions, loss landscapes and Hessian spectra of trained checkpoints, the
live diagnostics during training (analysis.monitor), the study (many runs on Ray) and its paper-ready report;
it builds on adapters/ (models, checkpoints) and bounds/ (the bounds, the statistics); no floor below imports it.
"""
