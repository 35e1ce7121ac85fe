// placeholder: implemented by the CPU reference
