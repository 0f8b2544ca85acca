"""Linkage: candidate search over embeddings, evidence fusion and identity flags.

Filled by the linkage milestone; kept apart from the network edge (`dicom_node`)
and from storage (`db`), and fed plain data by both.
"""
