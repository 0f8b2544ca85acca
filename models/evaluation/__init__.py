"""Scoring an identity model on a labelled set: metrics, baselines (pixel cosine, frozen
ImageNet backbone), the geometric check over a set's pairs, reports and plots."""
