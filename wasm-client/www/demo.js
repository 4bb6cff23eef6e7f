// Demo page: let ?api-key=…&models=…&max-edge=…&lane=…&lane-choice=… override the element's attributes.
const params = new URLSearchParams(window.location.search);
const uploader = document.querySelector('sightline-uploader');
if (uploader) {
  for (const name of ['api-key', 'api-base', 'models', 'max-edge', 'lane', 'lane-choice']) {
    const value = params.get(name);
    if (value !== null) uploader.setAttribute(name, value);
  }
}
