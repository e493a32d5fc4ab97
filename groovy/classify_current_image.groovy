/*
 * Classify the nuclei of the current image with nuclass-qupath and write the results back.
 *
 * What it does: exports the cells (or detections) of the current image with QuPath's own
 * GeoJSON export, runs `nuclass-qupath classify` from a Python environment on the image file,
 * and applies the returned classes and measurements to the same objects, matched by object id.
 * With a selected annotation, only the objects whose centroid lies inside it are classified.
 *
 * Parameters (set them below):
 *   pythonEnv      folder of the Python environment with nuclass-qupath installed (the folder
 *                  that contains bin/ on Linux and macOS, or Scripts\ on Windows)
 *   modelPath      model file to use; empty uses the model bundled with nuclass-qupath
 *   heatmapTileUm  edge length in µm of heatmap tiles; 0 adds no heatmap
 *   keepTempFiles  keep the exported and returned GeoJSON files, for inspection
 *
 * Output, on each classified object:
 *   - the predicted class, registered with the model's colour unless the project already has it
 *   - measurements "NuClass: confidence", "NuClass: gate" and "NuClass: p(<class>)"; every earlier
 *     measurement starting with "NuClass: " is removed first, all other measurements stay
 * With heatmapTileUm > 0, tile objects named "NuClass heatmap" with measurements
 * "NuClass: cells", "NuClass: mean confidence" and "NuClass: fraction <class>" replace the
 * tiles of an earlier run (show them with Measure > Show measurement maps).
 * In a project, the image metadata records "NuClass model" and "NuClass version".
 *
 * QuPath versions: 0.5 and 0.6. Works from the script editor and with "Run for project",
 * since it opens no dialog. The image must be a local file that nuclass-qupath can read.
 */

import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import com.google.gson.JsonParser
import groovy.transform.Field
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import javafx.application.Platform
import org.slf4j.LoggerFactory
import qupath.lib.common.ColorTools
import qupath.lib.common.GeneralTools
import qupath.lib.gui.scripting.QPEx
import qupath.lib.images.ImageData
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathDetectionObject
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathTileObject
import qupath.lib.objects.classes.PathClass

// Parameters
String pythonEnv = ""
String modelPath = ""
double heatmapTileUm = 0
boolean keepTempFiles = false

// Check the parameters and find the nuclass-qupath command
if (pythonEnv.trim().isEmpty())
    throw new IllegalArgumentException("Set pythonEnv at the top of the script to the folder of the Python environment that has nuclass-qupath installed")
if (heatmapTileUm < 0)
    throw new IllegalArgumentException("heatmapTileUm must be 0 (no heatmap) or a tile size in µm, not " + heatmapTileUm)
File executable = findNuclassExecutable(new File(pythonEnv.trim()))

// Get the image, its file and its pixel size
ImageData imageData = getCurrentImageData()
if (imageData == null)
    throw new IllegalStateException("No image is open: open an image, or use Run for project")
def server = imageData.getServer()
def uris = server.getURIs()
if (uris.size() != 1)
    throw new IllegalStateException("The image is built from " + uris.size() + " files; nuclass-qupath needs an image read from one file")
def slidePath = GeneralTools.toPath(uris.iterator().next())
if (slidePath == null || !Files.isRegularFile(slidePath))
    throw new IllegalStateException("The image file " + uris.iterator().next() + " is not a local file that exists")
def calibration = server.getPixelCalibration()
Double mpp = calibration.hasPixelSizeMicrons() ? calibration.getAveragedPixelSizeMicrons() : null
if (heatmapTileUm > 0 && mpp == null)
    throw new IllegalStateException("The heatmap needs the pixel size in µm: set it under Image > Pixel width, or set heatmapTileUm = 0")

// Choose the objects: those inside the selected annotation, or all cells and detections
def hierarchy = imageData.getHierarchy()
def selected = getSelectedObject()
Collection<PathObject> candidates
if (selected == null) {
    candidates = hierarchy.getDetectionObjects()
} else if (selected.isAnnotation() && selected.hasROI() && selected.getROI().isArea()) {
    candidates = hierarchy.getObjectsForROI(PathDetectionObject, selected.getROI())
} else {
    throw new IllegalArgumentException("Select an area annotation to classify the cells inside it, or select nothing to classify the whole image (selected: " + selected + ")")
}
List<PathObject> objects = new ArrayList<PathObject>(candidates.findAll { !(it instanceof PathTileObject) })
if (objects.isEmpty())
    throw new IllegalStateException("No cells or detections to classify: run cell detection first (Analyze > Cell detection)")
logger.info("Classifying {} objects of {}", objects.size(), slidePath)

// Export the objects with QuPath's own GeoJSON export
File cellsFile = File.createTempFile("nuclass-cells-", ".geojson")
File resultsFile = File.createTempFile("nuclass-results-", ".geojson")
File runFile = runMetadataFile(resultsFile)
try {
    PathIO.exportObjectsAsGeoJSON(cellsFile, objects,
            PathIO.GeoJsonExportOptions.FEATURE_COLLECTION, PathIO.GeoJsonExportOptions.EXCLUDE_MEASUREMENTS)

    // Run nuclass-qupath, streaming its output into the QuPath log
    List<String> command = [executable.getAbsolutePath(), "classify", slidePath.toString(),
            "--cells", cellsFile.getAbsolutePath(), "-o", resultsFile.getAbsolutePath(),
            "--metadata", runFile.getAbsolutePath()]
    if (mpp != null)
        command.addAll(["--mpp", String.valueOf(mpp)])
    if (heatmapTileUm > 0)
        command.addAll(["--heatmap-um", String.valueOf(heatmapTileUm)])
    if (!modelPath.trim().isEmpty())
        command.addAll(["--model", modelPath.trim()])
    runNuclass(command)

    // Read the returned GeoJSON and apply it to the same objects by id
    JsonObject root = readJson(resultsFile, true)
    Map counts = applyNuclassResults(imageData, objects, root, heatmapTileUm > 0)
    if (counts.classified == 0)
        throw new IllegalStateException("nuclass-qupath returned no result that matches an object of this image")
    if (counts.withoutObject > 0)
        logger.warn("{} results match no object of this image and were ignored", counts.withoutObject)
    logger.info("Classified {} objects; heatmap tiles: {} removed, {} added", counts.classified, counts.tilesRemoved, counts.tilesAdded)

    // Record the model in the image metadata and save the project changes
    recordRunInfo(runFile)
    syncProject()
} finally {
    if (keepTempFiles) {
        logger.info("Kept {}, {} and {}", cellsFile, resultsFile, runFile)
    } else {
        cellsFile.delete()
        resultsFile.delete()
        runFile.delete()
    }
}


/** Return the nuclass-qupath command of a Python environment, or throw if it is not there. */
File findNuclassExecutable(File environment) {
    def candidates = [new File(environment, "bin/nuclass-qupath"),
                      new File(environment, "Scripts/nuclass-qupath.exe"),
                      new File(environment, "Scripts/nuclass-qupath")]
    def found = candidates.find { it.isFile() }
    if (found == null)
        throw new IllegalArgumentException("nuclass-qupath not found in " + environment + ": install it there with 'pip install nuclass-qupath', or fix pythonEnv")
    return found
}

/** Run a command, log each output line, and throw with the last lines if it fails. */
void runNuclass(List<String> command) {
    logger.info("Running {}", command.join(" "))
    def builder = new ProcessBuilder(command)
    builder.redirectErrorStream(true)
    builder.environment().put("PYTHONUNBUFFERED", "1")
    def process = builder.start()
    LinkedList<String> lastLines = new LinkedList<String>()
    try {
        process.getInputStream().withReader("UTF-8") { reader ->
            reader.eachLine { String line ->
                logger.info("nuclass-qupath: {}", line)
                lastLines.add(line)
                if (lastLines.size() > 20)
                    lastLines.removeFirst()
            }
        }
        int exitCode = process.waitFor()
        if (exitCode != 0)
            throw new IllegalStateException("nuclass-qupath failed with exit code " + exitCode + ":\n" + lastLines.join("\n"))
    } finally {
        if (process.isAlive())
            process.destroy()
    }
}

/** Save the project, if there is one, so that new classes and image metadata are kept. */
void syncProject() {
    def project = getProject()
    if (project == null)
        return
    try {
        project.syncChanges()
    } catch (IOException e) {
        logger.warn("Saving the project failed: {}", e.getMessage())
    }
}


// BEGIN shared rules (keep identical in classify_current_image.groovy and import_batch_results.groovy;
// nuclass_qupath/qupath/results.py applies the same rules in Python)

@Field final String MEASUREMENT_PREFIX = "NuClass: "
@Field final String TILE_NAME = "NuClass heatmap"
@Field final String TILE_CELLS_MEASUREMENT = "NuClass: cells"
@Field final String METADATA_MODEL_KEY = "NuClass model"
@Field final String METADATA_VERSION_KEY = "NuClass version"
@Field final String RESULTS_DIR_NAME = "nuclass_results"
@Field final String RESULTS_SUFFIX = ".nuclass.geojson"
@Field final def logger = LoggerFactory.getLogger("nuclass")

/**
 * Apply result features to objects by id: set the class, replace "NuClass: " measurements,
 * and, when replaceTiles is true, replace earlier heatmap tiles by the tiles of the results.
 * Returns the counts classified, withoutObject, tilesRemoved and tilesAdded.
 */
Map applyNuclassResults(ImageData imageData, Collection<PathObject> candidates, JsonObject root, boolean replaceTiles) {
    def hierarchy = imageData.getHierarchy()

    // Index the objects by id
    Map<String, PathObject> byId = [:]
    for (PathObject pathObject : candidates)
        byId.put(pathObject.getId().toString(), pathObject)

    // Set classes and measurements of the matched objects
    Map<String, PathClass> classes = [:]
    List<PathClass> added = []
    List<JsonObject> tiles = []
    int classified = 0
    int withoutObject = 0
    for (JsonElement element : root.getAsJsonArray("features")) {
        JsonObject feature = element.getAsJsonObject()
        JsonObject properties = jsonObject(feature, "properties") ?: new JsonObject()
        if (jsonString(properties, "objectType") == "tile") {
            tiles.add(feature)
            continue
        }
        String id = jsonString(feature, "id")
        if (id == null)
            continue
        PathObject pathObject = byId.get(id)
        if (pathObject == null) {
            withoutObject++
            continue
        }
        mergeMeasurements(pathObject, jsonObject(properties, "measurements") ?: new JsonObject())
        JsonObject classification = jsonObject(properties, "classification")
        if (classification != null)
            pathObject.setPathClass(resolvePathClass(classification, classes, added))
        classified++
    }

    // Replace earlier heatmap tiles, never adding a second set
    int tilesRemoved = 0
    int tilesAdded = 0
    if (replaceTiles) {
        def oldTiles = hierarchy.getTileObjects().findAll { isNuclassTile(it) }
        hierarchy.removeObjects(oldTiles, true)
        tilesRemoved = oldTiles.size()
        def gson = GsonTools.getInstance()
        def newTiles = tiles.collect { gson.fromJson(it, PathObject) }
        hierarchy.addObjects(newTiles)
        tilesAdded = newTiles.size()
    }

    // Register new classes and update the views
    registerPathClasses(added)
    fireHierarchyUpdate(hierarchy)
    return [classified: classified, withoutObject: withoutObject, tilesRemoved: tilesRemoved, tilesAdded: tilesAdded]
}

/** Return whether an object is a heatmap tile written by nuclass-qupath. */
boolean isNuclassTile(PathObject pathObject) {
    if (!(pathObject instanceof PathTileObject))
        return false
    return TILE_NAME == pathObject.getName() || pathObject.getMeasurementList().containsKey(TILE_CELLS_MEASUREMENT)
}

/** Remove every "NuClass: " measurement of an object, then put the new ones; other measurements stay. */
void mergeMeasurements(PathObject pathObject, JsonObject measurements) {
    def list = pathObject.getMeasurementList()
    def names = new ArrayList<String>(list.asMap().keySet())
    for (String name : names) {
        if (name.startsWith(MEASUREMENT_PREFIX))
            list.remove(name)
    }
    for (def entry : measurements.entrySet()) {
        String name = entry.getKey()
        if (!name.startsWith(MEASUREMENT_PREFIX))
            throw new IllegalStateException("Result measurement '" + name + "' does not start with '" + MEASUREMENT_PREFIX + "'")
        JsonElement value = entry.getValue()
        list.put(name, value.isJsonNull() ? Double.NaN : value.getAsDouble())
    }
}

/** Return the class of a GeoJSON classification; a class the project already has keeps its colour. */
PathClass resolvePathClass(JsonObject classification, Map<String, PathClass> cache, List<PathClass> added) {
    String name = classificationName(classification)
    if (cache.containsKey(name))
        return cache.get(name)
    Integer rgb = null
    JsonArray color = classification.has("color") ? classification.getAsJsonArray("color") : null
    if (color != null && color.size() >= 3)
        rgb = ColorTools.packRGB(color.get(0).getAsInt(), color.get(1).getAsInt(), color.get(2).getAsInt())
    def project = getProject()
    PathClass pathClass = project == null ? null : project.getPathClasses().find { it.toString() == name }
    if (pathClass != null) {
        if (rgb != null && pathClass.getColor() != null && (pathClass.getColor() & 0xFFFFFF) != (rgb & 0xFFFFFF))
            logger.warn("Class '{}' keeps the project's colour, which differs from the model's", name)
    } else {
        pathClass = PathClass.fromString(name)
        if (rgb != null)
            pathClass.setColor(rgb)
        added.add(pathClass)
    }
    cache.put(name, pathClass)
    return pathClass
}

/** Return the class name as QuPath shows it, joining the names of a derived class with ": ". */
String classificationName(JsonObject classification) {
    if (classification.has("names"))
        return classification.getAsJsonArray("names").collect { it.getAsString() }.join(": ")
    return classification.get("name").getAsString()
}

/** Add new classes to the project, and to the class list of the QuPath window if there is one. */
void registerPathClasses(List<PathClass> added) {
    if (added.isEmpty())
        return
    def project = getProject()
    if (project != null) {
        def all = new ArrayList<PathClass>(project.getPathClasses())
        all.addAll(added.findAll { !all.contains(it) })
        project.setPathClasses(all)
    }
    def gui = QPEx.getQuPath()
    if (gui != null) {
        // The class list of the window belongs to the JavaFX thread
        Platform.runLater {
            def available = gui.getAvailablePathClasses()
            available.addAll(added.findAll { !available.contains(it) })
        }
    }
}

/** Copy the model id and nuclass-qupath version of a run metadata file into the image metadata. */
void recordRunInfo(File runFile) {
    def entry = getProjectEntry()
    if (entry == null)
        return
    if (!runFile.isFile()) {
        logger.info("No run metadata at {}; the image metadata does not record the model", runFile)
        return
    }
    JsonObject info = readJson(runFile, false)
    JsonObject model = jsonObject(info, "model")
    String modelId = model == null ? null : jsonString(model, "model_id")
    if (modelId != null)
        entry.putMetadataValue(METADATA_MODEL_KEY, modelId)
    if (jsonString(info, "version") != null)
        entry.putMetadataValue(METADATA_VERSION_KEY, jsonString(info, "version"))
}

/** Return the run metadata file written beside a results file (X.nuclass.geojson -> X.nuclass.run.json). */
File runMetadataFile(File resultsFile) {
    String name = resultsFile.getName()
    for (String suffix : [".geojson.gz", ".json.gz", ".geojson", ".json", ".gz"]) {
        if (name.endsWith(suffix)) {
            name = name.substring(0, name.length() - suffix.length())
            break
        }
    }
    return new File(resultsFile.getParentFile(), name + ".run.json")
}

/** Parse a JSON file; with featureCollection, check that it is a GeoJSON FeatureCollection. */
JsonObject readJson(File file, boolean featureCollection) {
    def reader = Files.newBufferedReader(file.toPath(), StandardCharsets.UTF_8)
    try {
        JsonElement root = JsonParser.parseReader(reader)
        if (!root.isJsonObject() || (featureCollection && !root.getAsJsonObject().has("features")))
            throw new IllegalStateException(file.toString() + (featureCollection ? " is not a GeoJSON FeatureCollection" : " does not hold a JSON object"))
        return root.getAsJsonObject()
    } finally {
        reader.close()
    }
}

/** Return the batch-results file name of an image, with path separators replaced. */
String resultsFileName(String imageName) {
    String safe = imageName.replaceAll('[/\\\\:]', '_').trim()
    return (safe.isEmpty() ? "image" : safe) + RESULTS_SUFFIX
}

JsonObject jsonObject(JsonObject parent, String key) {
    return parent.has(key) && parent.get(key).isJsonObject() ? parent.getAsJsonObject(key) : null
}

String jsonString(JsonObject parent, String key) {
    return parent.has(key) && parent.get(key).isJsonPrimitive() ? parent.get(key).getAsString() : null
}

// END shared rules
