"""GPU fast paths. Each kernel sits beside a torch reference, which every other device uses."""
