"""Operations: static and dynamic inspect, Precise BN, Adaptive BN, ghost-batch analysis,
image corruptions. They return records and findings, and never print."""
