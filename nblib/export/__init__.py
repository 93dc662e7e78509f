"""The Export, Generate and Publish cells: final_model/ in Hugging Face format, its GGUF and model
card, samples, the upload."""
