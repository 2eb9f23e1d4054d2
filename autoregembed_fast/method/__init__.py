"""AutoRegEmbed, the method, built on the op package (`autoregembed_fast.ops`, `.losses`,
`.huggingface`): the encoder with its compress tokens and the frozen decoder (`model`), data and
tokenisation (`data`), padding-free packing (`packing`), the method's losses (`losses`), reconstruction
NLL (`reconstruction`), LoRA (`lora`), evaluation (`evaluate`), the demo (`demo`) and the training
loop with its commands (`training`). Nothing of the op package imports from here."""
