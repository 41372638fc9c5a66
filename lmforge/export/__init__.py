"""Export to and import from the Hugging Face Llama layout."""

from lmforge.export.hf import config_from_hf, export_hf, from_hf_state_dict, hf_config, import_hf, to_hf_state_dict

__all__ = ["config_from_hf", "export_hf", "from_hf_state_dict", "hf_config", "import_hf", "to_hf_state_dict"]
