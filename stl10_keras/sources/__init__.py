"""Dataset sources behind `stl10_keras.data.load_splits`, one module each."""
