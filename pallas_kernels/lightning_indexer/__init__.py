"""Lightning indexer scores I[t,s] = sum_j w[t,j] * ReLU(q[t,j] . k[s]) (DeepSeek-V3.2 paper, section 2.1)."""
