"""NExT-Chat (pix2emb) for Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration import NextChatConfig
from .modeling_nextchat import (
    NextChatCausalLMOutputWithPast,
    NextChatForConditionalGeneration,
    NextChatModel,
    NextChatPreTrainedModel,
)
from .generation_nextchat import NextChatGenerateOutput
from .loss_nextchat import NextChatLossWeights
from .pipeline_nextchat import TASK as GROUNDING_TASK, NextChatGroundingPipeline
from .processing import NextChatImageProcessor, NextChatLlamaTokenizer, NextChatProcessor


AutoConfig.register("nextchat", NextChatConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(NextChatConfig, NextChatForConditionalGeneration, exist_ok=True)
# One PIL/numpy implementation serves both backends (without the torchvision entry, every load warns that the
# default torchvision backend is "not available").
AutoImageProcessor.register(
    NextChatConfig, image_processor_classes={"pil": NextChatImageProcessor, "torchvision": NextChatImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(NextChatConfig, NextChatProcessor, exist_ok=True)
# The tokenizer `nextchat-convert` writes (tokenizer_config.json names it); other folders name their own class.
AutoTokenizer.register(NextChatConfig, tokenizer_class=NextChatLlamaTokenizer, exist_ok=True)
# The grounding pipeline, as transformers registers custom pipelines; folders name it in `custom_pipelines` too.
if GROUNDING_TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        GROUNDING_TASK, pipeline_class=NextChatGroundingPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
    )


__all__ = [
    "NextChatConfig",
    "NextChatPreTrainedModel",
    "NextChatModel",
    "NextChatForConditionalGeneration",
    "NextChatLossWeights",
    "NextChatCausalLMOutputWithPast",
    "NextChatGenerateOutput",
    "NextChatGroundingPipeline",
    "NextChatImageProcessor",
    "NextChatProcessor",
]
