"""A Keras model converted by tf2onnx (the way a Keras user gets an ``.onnx``), against Keras's own Grad-CAM.

Needs ``tensorflow-cpu`` and ``tf2onnx`` (PyPI), which are no dependency of onnxcam: the tests skip
where they do not import (CI). The reference is the Grad-CAM of the Keras documentation's example
("Grad-CAM class activation visualization"), done with ``tf.GradientTape`` on the same model: the
gradient of the predicted class's softmax output w.r.t. ``block5_conv3``, averaged over the grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam_export.from_onnx import Preprocessing, graft_file

tf = pytest.importorskip("tensorflow", reason="tensorflow-cpu is an optional test dependency (not in CI)")
tf2onnx = pytest.importorskip("tf2onnx", reason="tf2onnx is an optional test dependency (not in CI)")
keras = tf.keras

PIXELS = Preprocessing.create(None, (0, 0, 0), (1 / 255,) * 3, False)  # the Keras model takes 0..255 pixels


def keras_vgg16(classes: int = 10, name: str = "vgg16") -> keras.Model:
    """Keras's VGG16 with seeded random weights and a narrow top (Flatten, Dense 64, Dense softmax), so that
    tf2onnx converts it in bounded memory; the convolutional part is the application's own, and the model has
    the application's name (``keras.applications.VGG16()`` is ``vgg16``)."""
    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    x = keras.layers.Flatten(name="flatten")(base.output)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    return keras.Model(base.input, keras.layers.Dense(classes, activation="softmax", name="predictions")(x), name=name)


def _convert(model: keras.Model, path: Path) -> Path:
    spec = (tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input"),)
    converted, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path.write_bytes(converted.SerializeToString())
    return path


def keras_grad_cam(model: keras.Model, image: np.ndarray, layer: str = "block5_conv3") -> tuple[np.ndarray, int]:
    """The Keras documentation's ``make_gradcam_heatmap``: d softmax_c / d A by GradientTape, alpha = its mean."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        conv, predictions = grad_model(image[None].astype(np.float32))
        index = int(tf.argmax(predictions[0]))
        score = predictions[:, index]
    grads = tape.gradient(score, conv)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.squeeze(conv[0] @ pooled[..., tf.newaxis])
    return tf.maximum(heatmap, 0).numpy() / float(tf.reduce_max(heatmap)), index


@pytest.mark.slow
def test_keras_vgg16_through_tf2onnx_gives_the_keras_grad_cam(tmp_path: Path) -> None:
    model = keras_vgg16(name="mine")
    source = _convert(model, tmp_path / "vgg16_keras.onnx")
    card, _ = graft_file(source, tmp_path / "vgg16_keras.cam.onnx", prep=PIXELS, score="probability")
    assert "block5_conv3" in card["layer"] and card["layer"].endswith("(512x14x14)"), card["layer"]
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    theirs, index = keras_grad_cam(model, image)
    ours = Explainer(tmp_path / "vgg16_keras.cam.onnx").explain(image, top_k=1).maps[0]
    assert ours.index == index
    assert np.corrcoef(ours.cam_lowres.ravel(), theirs.ravel())[0, 1] >= 0.999


@pytest.mark.slow
def test_a_keras_application_is_explained_as_preprocess_input_feeds_it_with_no_flag(tmp_path: Path) -> None:
    """tf2onnx names every node after the Keras model: VGG16's file says it is VGG16, so the graft takes
    ``preprocess_input``'s caffe mode (BGR minus the ImageNet mean on 0..255) and ``load_img``'s resize by itself;
    the prediction and the map of a photo equal Keras' own on ``preprocess_input(load_img(photo))``."""
    from tests.conftest import EXAMPLES

    model = keras_vgg16()
    source = _convert(model, tmp_path / "vgg16.onnx")
    card, _ = graft_file(source, tmp_path / "vgg16.cam.onnx", score="probability")  # (the Keras example's score)
    assert card["sources"]["mean"] == "Keras application 'vgg16' (preprocess_input mode caffe)"
    photo = EXAMPLES / "chelsea.png"
    loaded = keras.utils.img_to_array(keras.utils.load_img(photo, target_size=(224, 224)))
    fed = keras.applications.vgg16.preprocess_input(loaded.copy())
    expected = model.predict(fed[None], verbose=0)[0]
    found = Explainer(tmp_path / "vgg16.cam.onnx").explain(str(photo), top_k=1)
    assert [p.index for p in found.predictions] == list(np.argsort(-expected)[:5])
    np.testing.assert_allclose([p.probability for p in found.predictions], np.sort(expected)[::-1][:5], atol=1e-4)
    grad_model = keras.Model(model.inputs, [model.get_layer("block5_conv3").output, model.output])
    with tf.GradientTape() as tape:
        conv, predictions = grad_model(fed[None])
        score = predictions[:, int(tf.argmax(predictions[0]))]
    heatmap = tf.maximum(tf.squeeze(conv[0] @ tf.reduce_mean(tape.gradient(score, conv), axis=(0, 1, 2))[:, None]), 0)
    assert np.corrcoef(found.maps[0].cam_lowres.ravel(), heatmap.numpy().ravel())[0, 1] >= 0.999


def test_a_tflite_file_through_tf2onnx_predicts_as_the_interpreter_and_has_keras_gradients(tmp_path: Path) -> None:
    """The TFLite path (``TFLiteConverter``, then ``tf2onnx.convert.from_tflite``: NHWC, tf2onnx's transposes): the
    grafted file's probabilities are the TFLite interpreter's on the same input, and its Grad-CAM weights at the
    last convolution are Keras's GradientTape ones on the same weights; its head's finite difference agrees too."""
    from tests.graph_fd import finite_difference

    keras.utils.set_random_seed(0)
    inputs = keras.layers.Input((32, 32, 3))
    last = keras.layers.Conv2D(16, 3, 2, padding="same", activation="relu", name="last")(
        keras.layers.Conv2D(8, 3, 2, padding="same", activation="relu")(inputs))  # fmt: skip
    outputs = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(last))
    model = keras.Model(inputs, outputs)
    (tmp_path / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    tf2onnx.convert.from_tflite(str(tmp_path / "m.tflite"), opset=17, output_path=str(tmp_path / "m.onnx"))
    prep = Preprocessing.create(None, (0, 0, 0), (1, 1, 1), False)  # the model takes pixel / 255
    card, _ = graft_file(tmp_path / "m.onnx", tmp_path / "m.cam.onnx", prep=prep, score="probability")
    assert card["task"] == "classification" and card["layer"].endswith("(16x8x8)"), card["layer"]
    explainer = Explainer(tmp_path / "m.cam.onnx")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = (image / 255.0).astype(np.float32)[None]
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "m.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    theirs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    out = explainer.engine.run(image[None], np.array([[-1, 2]]))
    probs = np.exp(out.logits[0] - out.logits[0].max())
    np.testing.assert_allclose(probs / probs.sum(), theirs, rtol=1e-5, atol=1e-6)
    grad_model = keras.Model(model.inputs, [model.get_layer("last").output, model.output])
    with tf.GradientTape(persistent=True) as tape:
        conv, predictions = grad_model(x)
        scores = [predictions[:, int(c)] for c in out.target_classes[0]]
    for t, score in enumerate(scores):
        expected = tf.reduce_mean(tape.gradient(score, conv), axis=(0, 1, 2)).numpy()
        np.testing.assert_allclose(out.weights[0, t], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    logit, _ = graft_file(tmp_path / "m.onnx", tmp_path / "logit.cam.onnx", prep=prep)  # (the difference: of logits)
    finite_difference(tmp_path / "logit.cam.onnx", logit, image, np.array([[-1, 2]]))
