"""Building, training, decoding and scoring PQM models on top of ESPnet."""
