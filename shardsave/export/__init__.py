"""Other formats written from trees and checkpoints: safetensors."""
